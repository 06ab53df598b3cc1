"""What a run's numbers mean: statistics (bootstrap intervals), the verdict, the printed report and the plots."""
