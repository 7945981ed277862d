"""Extensions written the way a user would write them, one file each, used by tests/test_extending.py."""
