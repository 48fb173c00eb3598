"""Test support: small models and fixtures shared by the tests beside each stage (not in the installed
package).

pytest puts `tests/` on the import path (`pythonpath` in pyproject.toml), so tests import `support.<module>`.
"""
