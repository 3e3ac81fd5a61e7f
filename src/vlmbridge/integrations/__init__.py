"""Integrations with other software (Dify first): the code behind `vlmbridge dify`."""
