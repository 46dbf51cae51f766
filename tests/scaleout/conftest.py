def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: submits jobs to a local one-node Slurm (slow; deselect with -m 'not slurm')")
