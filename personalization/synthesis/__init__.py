"""Synthetic training data for one instance: prompts, DreamBooth, image sampling, cut-and-paste.

Modules are imported by name (``from personalization.synthesis import cutpaste``); nothing is imported here so
that importing one part never pulls in the heavy dependencies of another (diffusers, torch).
"""
