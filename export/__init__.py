"""gemvg.export."""
