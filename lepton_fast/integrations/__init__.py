"""Drop-in replacements for other libraries' distillation losses (``lepton_fast.integrations.trl``)."""
