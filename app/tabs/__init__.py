"""The app's four tabs, one module each: train, library, compose, evaluate."""
