"""The renderer (Bottlerocket's thar-be-settings + schnauzer): templates and apply."""
