"""gRPC plumbing shared by the teacher and reward services: serving, auth, client channels, retries."""
