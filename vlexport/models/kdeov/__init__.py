"""kdeov."""
