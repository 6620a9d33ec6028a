"""sclip."""
