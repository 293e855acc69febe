"""Local fakes of providers' control planes, for tests."""
