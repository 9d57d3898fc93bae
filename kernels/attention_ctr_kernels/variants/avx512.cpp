// The avx512 build of ../recurrence.cpp (setup.py gives each variant its own flags).
#include "../recurrence.cpp"
