"""The admin surface: the admin service (status socket, sd_notify, SIGHUP reload,
metrics), its reports, and the cvmfsctl client. Built on cvmfsd.core, never the other
way round."""
