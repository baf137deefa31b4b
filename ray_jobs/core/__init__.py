"""What every stage stands on and no stage owns."""
