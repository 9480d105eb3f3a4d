"""What the workers' fork server imports first (``workers.PRELOAD``): the CLI's quiet logging, so that the
libraries it then imports log nothing a campaign would show. No torch threads are started here: a process
forked after OpenMP ran threads hangs when it starts its own."""

from ._quiet import quiet_libraries

quiet_libraries()
