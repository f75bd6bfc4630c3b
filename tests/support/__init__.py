"""Helpers shared by test modules. A test module imports helpers from here (or gets fixtures from a
conftest.py), never from another test module (``tests/test_test_layout.py`` checks this)."""
