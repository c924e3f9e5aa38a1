"""The sweep runner: prepares suites, merges, evaluates and stores."""
