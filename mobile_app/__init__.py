"""The Kivy demo app and the runtime backends a phone build reaches onnxruntime through."""
