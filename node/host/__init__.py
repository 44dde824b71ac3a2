"""The host role: serving orders from backends, its checks, schedule, metrics and peer verification."""
