"""Drug response: ln(IC50) per cell line and drug (ic50.py), expression after a drug and dose
(expression.py), and the drug features both use (features.py)."""
