"""The model card template hf_zero fills in beside the models it writes (`hf_zero.hub.model_card`)."""
