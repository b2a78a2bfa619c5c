"""What the trainers share: the run folder, the latent cache, EMA, schedules, losses, the progress scaffold."""
