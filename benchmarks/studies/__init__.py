"""Studies of the conversion and recovery (allocation of ranks and rotary dims, recovered quality, training-step cost)."""
