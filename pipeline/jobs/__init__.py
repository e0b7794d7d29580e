"""Jobs on a Ray cluster: submission through Ray's Jobs API (`submit`) and the recurring
retraining scheduler (`scheduler`)."""
