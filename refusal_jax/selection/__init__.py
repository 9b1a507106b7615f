"""Selection of the steering components: candidate scoring, filters and ranking."""
