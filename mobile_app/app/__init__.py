"""The Kivy demo app: chat with tools, the on-device benchmark, bundle download (see README.md)."""
