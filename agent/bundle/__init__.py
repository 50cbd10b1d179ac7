"""The config bundle: manifests (pure), pull and publish, render (pure) and apply.
"""
