"""Entry points: python -m launch.train, and later launch.submit, launch.sample."""
