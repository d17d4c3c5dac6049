"""Typed views of meshtls's custom resources, their defaults and their validation. Pure."""
