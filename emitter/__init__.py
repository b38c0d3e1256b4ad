"""Emitter: builds the Keras functional model from the IR and saves it (.keras, SavedModel)."""
