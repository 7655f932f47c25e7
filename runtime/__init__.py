"""gemvg.runtime."""
