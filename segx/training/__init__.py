"""Training one member: the fit loop, patch sampling, augmentation, and what a job may use
(threads, devices, launchers). The member run itself: segx.workflows.member."""
