"""Sequential recommendation: models, losses, batching, training, evaluation, bundles, tracking and the CLI."""
