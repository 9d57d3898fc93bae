"""attention_ctr: attention-based CTR ranking (DIN, DIEN, BST) as a Kedro project."""

__version__ = "0.1.0"
