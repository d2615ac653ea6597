"""Support code for the tests, one copy of each helper; test modules import from here
(``from tests.support.wire import Wire``), never from one another. README "Tests" lists
the modules; shared fixtures are in tests/conftest.py."""
