"""Sample model app for agogosml: a credit-card fraud scorer."""
