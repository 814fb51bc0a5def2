"""The model card template hf_zero fills in beside the models it writes (`hf_zero.model_card`)."""
