"""gemvg.train."""
