"""Training state kept off the GPU: CPU optimizer offload through page-locked staging
(`host_staging.py`) and the NVMe swapper (`nvme.py`)."""
