"""The test suite is a package, so every test imports its helpers one way: `from tests.x import ...`."""
