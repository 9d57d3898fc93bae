// The avx2 build of ../recurrence.cpp (setup.py gives each variant its own flags).
#include "../recurrence.cpp"
