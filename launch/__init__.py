"""Integration with existing launchers (deepspeed, torchrun, SLURM). No home-made launcher."""
