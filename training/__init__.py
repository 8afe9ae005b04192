"""The training run's parts below train.py: optimizer and parameter groups (optim.py), learning-rate schedules
(schedule.py), the run's log (runlog.py), its processes (processes.py) and its checkpoints (checkpoints.py)."""
