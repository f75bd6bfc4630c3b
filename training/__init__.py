"""SFT and evaluation entry points (torch / transformers / DeepSpeed; never Prefect or Ray)."""
