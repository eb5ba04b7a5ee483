"""Training: run configs, the loop and one step, distributed and GradCache paths, the teacher, resumable state."""
