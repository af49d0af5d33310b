"""What an optimizer step needs besides the optimizer: the learning rate of every step (`schedule`) and which
parameters take weight decay (`param_groups`)."""
