"""Looking inside BiFormer: FLOP counts, the paper's complexity trade-off, routing pictures, checkpoint conversion."""
