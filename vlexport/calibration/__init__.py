"""INT8: QDQ quantisation with calibrated activations, weight-only quantisation, the accuracy gate."""
