"""The data a run is made of: (prompt, seed) splits and the teacher-trajectory store."""
