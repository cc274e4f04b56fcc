"""What more than one service uses, and nothing else: `libs.common`."""
