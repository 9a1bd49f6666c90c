"""Atelier's Gradio app and job runner. No model math here: it calls training/, composition/, evaluation/."""
