"""The training engine behind `biformer train`: one loop for every task, single process or DistributedDataParallel
under torchrun, with exact resume; and the files of a run folder."""
