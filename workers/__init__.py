"""Workers: an agent that runs, supervises and registers one engine replica."""
